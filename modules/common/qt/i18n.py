"""German and English for the three apps through Qt's translation system.

The apps write English source strings with ``t("...")`` (whole sentences with ``{name}``
placeholders, never pieced together) and Qt asks the installed ``QTranslator`` for them; the
German catalogue below is that translator's table.  The language follows the system locale
unless ``--language de|en`` (or ``set_language``) says otherwise.
"""

from __future__ import annotations

from PySide6.QtCore import QCoreApplication, QLibraryInfo, QLocale, QTranslator

CONTEXT = "hausmeister"

GERMAN: dict[str, str] = {
    # common
    "Hausmeister Support": "Hausmeister-Fernwartung",
    "Server": "Server",
    "Server address": "Serveradresse",
    "CA fingerprint (compare it with what your administrator gave you)":
        "CA-Fingerabdruck (mit dem vergleichen, den Ihre Administration Ihnen gegeben hat)",
    "User name": "Benutzername",
    "Password": "Passwort",
    "Cancel": "Abbrechen",
    "OK": "OK",
    "Yes": "Ja",
    "No": "Nein",
    "Close": "Schließen",
    "Language": "Sprache",
    "English": "Englisch",
    "German": "Deutsch",
    "End session": "Sitzung beenden",
    "EMERGENCY STOP": "NOT-AUS",
    "Emergency stop (Ctrl+F12)": "Not-Aus (Strg+F12)",
    "Session ended: {reason}": "Sitzung beendet: {reason}",
    "Uploading the rest of the session recording …":
        "Der Rest der Sitzungsaufzeichnung wird hochgeladen …",
    "The session recording is complete on the server.":
        "Die Sitzungsaufzeichnung ist vollständig auf dem Server.",
    "The rest of the session recording could not be uploaded.":
        "Der Rest der Sitzungsaufzeichnung konnte nicht hochgeladen werden.",
    "Verification code: {code}": "Prüfcode: {code}",
    "Verification code: {code} (compare it with the other side by phone)":
        "Prüfcode: {code} (vergleichen Sie ihn telefonisch mit der Gegenseite)",
    "Chat": "Chat",
    "Send": "Senden",
    "Type a message": "Nachricht eingeben",
    "{who} writes: {text}": "{who} schreibt: {text}",
    "You write: {text}": "Sie schreiben: {text}",
    "Connecting ...": "Verbinde ...",
    "Connected, securing the session ...": "Verbunden, sichere die Sitzung ...",
    "Error: {message}": "Fehler: {message}",
    "There is no session with this ID. Check the eight digits with your supporter and try again.":
        "Zu dieser ID gibt es keine Sitzung. Prüfen Sie die acht Ziffern mit Ihrem Supporter und "
        "versuchen Sie es noch einmal.",
    "Too many wrong attempts. Wait a few minutes, then try again.":
        "Zu viele falsche Versuche. Warten Sie einige Minuten und versuchen Sie es dann noch "
        "einmal.",
    "This computer is offline right now. Try again once it is online.":
        "Dieser Rechner ist gerade nicht erreichbar. Versuchen Sie es, sobald er online ist.",
    "The server does not know this computer (any more).":
        "Der Server kennt diesen Rechner nicht (mehr).",
    "The server cannot record sessions right now, so none starts. Try again later or tell your "
    "administrator.":
        "Der Server kann Sitzungen gerade nicht aufzeichnen, daher startet keine. Versuchen Sie "
        "es später noch einmal oder wenden Sie sich an Ihre Administration.",
    "This is not the expected support server (its identity does not match). Do not continue, "
    "and tell your supporter.":
        "Das ist nicht der erwartete Support-Server (seine Identität stimmt nicht). Fahren Sie "
        "nicht fort und sagen Sie es Ihrem Supporter.",
    "The support server cannot be reached. Check this computer's network connection and try "
    "again in a moment.":
        "Der Support-Server ist nicht erreichbar. Prüfen Sie die Netzwerkverbindung dieses "
        "Computers und versuchen Sie es gleich noch einmal.",
    "Not connected to the server right now; the list reconnects by itself. Try again in a "
    "moment.":
        "Gerade nicht mit dem Server verbunden; die Liste verbindet sich von selbst neu. "
        "Versuchen Sie es gleich noch einmal.",
    "The password or ID does not match, so the session was not started. Check it and try again.":
        "Passwort oder ID stimmen nicht, die Sitzung wurde nicht gestartet. Prüfen Sie die Angabe "
        "und versuchen Sie es noch einmal.",
    "the supporter": "der Supporter",
    "the customer": "der Kunde",
    "the host": "der Rechner",
    "you": "Sie",
    # rights and consent
    "view": "Ansehen",
    "control": "Steuern",
    "files": "Dateien",
    "Allow {who} to see your screen?": "Darf {who} Ihren Bildschirm sehen?",
    "Allow {who} to control your mouse and keyboard?":
        "Darf {who} Maus und Tastatur steuern?",
    "Allow {who} to transfer files to and from this computer?":
        "Darf {who} Dateien mit diesem Computer austauschen?",
    "{who} asks you to show your screen instead. Show your screen?":
        "{who} bittet Sie, stattdessen Ihren Bildschirm zu zeigen. Bildschirm zeigen?",
    "Question from {who}": "Frage von {who}",
    "Allow": "Erlauben",
    "Refuse": "Ablehnen",
    "Support terms": "Support-Bedingungen",
    "Please read the terms of this support session.":
        "Bitte lesen Sie die Bedingungen dieser Support-Sitzung.",
    "Accept": "Annehmen",
    "Decline": "Ablehnen",
    "{who} granted {right}.": "{who} hat „{right}“ erlaubt.",
    "{who} refused {right}: {reason}": "{who} hat „{right}“ abgelehnt: {reason}",
    "{who} took back {right}: {reason}": "{who} hat „{right}“ zurückgenommen: {reason}",
    "You pressed the emergency stop.": "Sie haben den Not-Aus ausgelöst.",
    "{who} pressed the emergency stop.": "{who} hat den Not-Aus ausgelöst.",
    "You ended the session.": "Sie haben die Sitzung beendet.",
    "{who} ended the session.": "{who} hat die Sitzung beendet.",
    "You declined the session.": "Sie haben die Sitzung abgelehnt.",
    "{who} declined the session.": "{who} hat die Sitzung abgelehnt.",
    "You withdrew the right to view.": "Sie haben das Recht zum Ansehen zurückgenommen.",
    "{who} withdrew the right to view.": "{who} hat das Recht zum Ansehen zurückgenommen.",
    "You did not reach the relay in time.": "Sie haben das Relay nicht rechtzeitig erreicht.",
    "{who} did not reach the relay in time.": "{who} hat das Relay nicht rechtzeitig erreicht.",
    "The connection was lost ({who}).": "Die Verbindung ist abgebrochen ({who}).",
    "Error in the session ({who}).": "Fehler in der Sitzung ({who}).",
    "The keys did not match (wrong ID or password).":
        "Die Schlüssel passten nicht zusammen (falsche ID oder falsches Passwort).",
    "Nothing happened for too long.": "Zu lange ist nichts geschehen.",
    "Access was revoked.": "Der Zugang wurde entzogen.",
    "The session protocol could not be written.":
        "Das Sitzungsprotokoll konnte nicht geschrieben werden.",
    "The required recording could not be made.":
        "Die vorgeschriebene Aufzeichnung konnte nicht erstellt werden.",
    "The server shut down.": "Der Server wurde beendet.",
    "The server stopped unexpectedly.": "Der Server wurde unerwartet beendet.",
    "The connection to the server was lost.": "Die Verbindung zum Server ist abgebrochen.",
    "{sentence} ({detail})": "{sentence} ({detail})",
    "the server": "der Server",
    "the relay": "das Relay",
    "emergency stop": "Not-Aus",
    "revoked": "widerrufen",
    "ended": "beendet",
    "terms declined": "Bedingungen abgelehnt",
    "terms not accepted in time": "Bedingungen nicht rechtzeitig angenommen",
    "You granted {right}.": "Sie haben „{right}“ erlaubt.",
    "You refused {right}: {reason}": "Sie haben „{right}“ abgelehnt: {reason}",
    "You took back {right}: {reason}": "Sie haben „{right}“ zurückgenommen: {reason}",
    "You accepted the support terms.": "Sie haben die Support-Bedingungen angenommen.",
    "{who} now shows the screen.": "{who} zeigt jetzt den Bildschirm.",
    "The customer accepted the support terms.": "Der Kunde hat die Support-Bedingungen angenommen.",
    "{who} is viewing your screen": "{who} sieht Ihren Bildschirm",
    "Pause screen": "Bildschirm anhalten",
    "Screen of {who}": "Bildschirm von {who}",
    "Resume screen": "Bildschirm fortsetzen",
    "You paused the screen: the other side sees the last picture.":
        "Sie haben den Bildschirm angehalten: Die Gegenseite sieht das letzte Bild.",
    "You resumed the screen.": "Sie zeigen den Bildschirm wieder.",
    "{who} paused the screen.": "{who} hat den Bildschirm angehalten.",
    "{who} resumed the screen.": "{who} zeigt den Bildschirm wieder.",
    "Paused by {who}: the last picture stays until the screen is resumed.":
        "Angehalten von {who}: Das letzte Bild bleibt stehen, bis es weitergeht.",
    "Screen paused: {who} sees the last picture":
        "Bildschirm angehalten: {who} sieht das letzte Bild",
    "{who} is controlling your screen": "{who} steuert Ihren Bildschirm",
    # what is shared: the whole screen or one window (all three apps)
    "Share: whole screen / one window ...": "Teilen: ganzer Bildschirm / ein Fenster ...",
    "What may {who} see?": "Was darf {who} sehen?",
    "Whole screen": "Ganzer Bildschirm",
    "Window: {title} ({width} × {height})": "Fenster: {title} ({width} × {height})",
    "Share": "Teilen",
    "You share the whole screen again.": "Sie teilen wieder den ganzen Bildschirm.",
    "You share only the window {title}.": "Sie teilen nur das Fenster „{title}“.",
    # customer app
    "Get help from your supporter": "Hilfe von Ihrem Supporter",
    "Type the 8-digit ID your supporter read out to you:":
        "Geben Sie die 8-stellige ID ein, die Ihr Supporter Ihnen genannt hat:",
    "Connect": "Verbinden",
    "The ID has 8 digits, like 1234 5678.": "Die ID hat 8 Ziffern, zum Beispiel 1234 5678.",
    "Connected with {supporter}.": "Verbunden mit {supporter}.",
    "No server is set up: place customer.toml from the download page beside the app.":
        "Kein Server eingerichtet: Legen Sie die customer.toml von der Download-Seite neben die App.",
    "Incoming file": "Eingehende Datei",
    "{who} wants to send you the file {name} ({size}). Accept it?":
        "{who} möchte Ihnen die Datei {name} ({size}) senden. Annehmen?",
    "File {name}: {percent} %": "Datei {name}: {percent} %",
    "File {name} received.": "Datei {name} empfangen.",
    "File {name} sent.": "Datei {name} gesendet.",
    "Save in: {folder}": "Speichern in: {folder}",
    "{name} ({size}) from {who}": "{name} ({size}) von {who}",
    "Change folder ...": "Ordner ändern ...",
    "Saved as {path}": "Gespeichert als {path}",
    "The file was not received: {reason}": "Die Datei wurde nicht empfangen: {reason}",
    "You declined the file {name}.": "Sie haben die Datei {name} abgelehnt.",
    "The file {name} was not transferred: {reason}":
        "Die Datei {name} wurde nicht übertragen: {reason}",
    # why a file was not transferred (modules.common.session.file_transfer.REASON_TEMPLATES)
    "cancelled": "abgebrochen",
    "declined": "abgelehnt",
    "cancelled by the supporter": "vom Supporter abgebrochen",
    "cancelled by the customer": "vom Kunden abgebrochen",
    "declined by the customer": "vom Kunden abgelehnt",
    "session ended": "die Sitzung ist beendet",
    "cancelled by the other side: {reason}": "von der Gegenseite abgebrochen ({reason})",
    "the files right is not granted": "das Recht „Dateien“ ist nicht erteilt",
    "this side does not receive files": "diese Seite nimmt keine Dateien an",
    "larger than the limit of {limit} bytes": "größer als die Grenze von {limit} Bytes",
    "too many offers wait for an answer": "zu viele Angebote warten auf eine Antwort",
    "SHA-256 mismatch": "die SHA-256-Prüfsumme stimmt nicht",
    "the file changed while it was sent": "die Datei hat sich beim Senden geändert",
    "the file changed since it was offered": "die Datei hat sich seit dem Angebot geändert",
    "cannot read the file: {problem}": "die Datei ist nicht lesbar: {problem}",
    "cannot create the file: {problem}": "die Datei lässt sich nicht anlegen: {problem}",
    "cannot write the file: {problem}": "die Datei lässt sich nicht schreiben: {problem}",
    "cannot store the file: {problem}": "die Datei lässt sich nicht speichern: {problem}",
    "cannot tell the free space: {problem}":
        "der freie Speicherplatz lässt sich nicht feststellen: {problem}",
    "not enough free space ({needed} bytes needed, {free} free)":
        "nicht genug freier Speicherplatz ({needed} Bytes nötig, {free} frei)",
    "the file would land outside the download directory":
        "die Datei würde außerhalb des Download-Ordners landen",
    "no free name for the file": "kein freier Name für die Datei",
    "empty file name": "leerer Dateiname",
    "file name is not valid Unicode": "der Dateiname ist kein gültiges Unicode",
    "file name longer than {limit} bytes": "der Dateiname ist länger als {limit} Bytes",
    "file name contains a path separator": "der Dateiname enthält ein Pfad-Trennzeichen",
    "file name is . or ..": "der Dateiname ist . oder ..",
    "file name contains control or invisible characters":
        "der Dateiname enthält Steuer- oder unsichtbare Zeichen",
    "file name contains a character Windows forbids":
        "der Dateiname enthält ein Zeichen, das Windows verbietet",
    "file name ends in a space or dot": "der Dateiname endet mit einem Leerzeichen oder Punkt",
    "file name starts with a space": "der Dateiname beginnt mit einem Leerzeichen",
    "file name is a Windows device name": "der Dateiname ist ein Windows-Gerätename",
    "No space left on device": "kein Platz mehr auf dem Datenträger",
    "Permission denied": "keine Berechtigung",
    "Read-only file system": "das Dateisystem ist schreibgeschützt",
    "Disk quota exceeded": "das Speicherkontingent ist erschöpft",
    "No such file or directory": "die Datei oder der Ordner fehlt",
    "File too large": "die Datei ist zu groß",
    "Input/output error": "Ein-/Ausgabefehler",
    # why a right or the direction change was refused (consent core)
    "no answer in time": "keine Antwort in der Zeit",
    "terms not accepted": "die Bedingungen sind nicht angenommen",
    "host policy": "Richtlinie des Rechners",
    # supporter app
    "Hosts": "Rechner",
    "Search": "Suchen",
    "All groups": "Alle Gruppen",
    "Name": "Name",
    "Group": "Gruppe",
    "Status": "Status",
    "Last seen": "Zuletzt gesehen",
    "Address": "Adresse",
    "online": "online",
    "offline": "offline",
    "never": "nie",
    "Refresh": "Aktualisieren",
    "New ad-hoc session": "Neue Ad-hoc-Sitzung",
    "Session password of {host}": "Sitzungspasswort von {host}",
    "Connecting to {host} ...": "Verbinde mit {host} ...",
    "Tell your customer this ID:": "Nennen Sie Ihrem Kunden diese ID:",
    "Waiting for the customer ...": "Warte auf den Kunden ...",
    "Customer joined from {address}.": "Kunde verbunden von {address}.",
    "This ID is no longer valid:": "Diese ID gilt nicht mehr:",
    "The connection to the server was lost. Reconnecting to draw a new ID ...":
        "Die Verbindung zum Server ist abgebrochen. Verbinde erneut, um eine neue ID zu "
        "erzeugen ...",
    "The connection to the server was lost, so a new ID was drawn. Tell your customer the new "
    "ID: {id}":
        "Die Verbindung zum Server war abgebrochen, daher wurde eine neue ID erzeugt. Nennen Sie "
        "Ihrem Kunden die neue ID: {id}",
    "The ID {old} expired unused, so a new ID was drawn. Tell your customer the new ID: {id}":
        "Die ID {old} ist ungenutzt abgelaufen, daher wurde eine neue ID erzeugt. Nennen Sie "
        "Ihrem Kunden die neue ID: {id}",
    "The ID {old} is about to expire unused, so a new ID was drawn. Tell your customer the new "
    "ID: {id} (a customer who already has {old} can still use it for {seconds} s)":
        "Die ID {old} läuft gleich ungenutzt ab, daher wurde eine neue ID erzeugt. Nennen Sie "
        "Ihrem Kunden die neue ID: {id} (ein Kunde, der {old} schon hat, kann sie noch "
        "{seconds} s lang nutzen)",
    "Valid until {time}; if nobody uses it by then, a new ID is drawn by itself.":
        "Gültig bis {time} Uhr; wird sie bis dahin nicht genutzt, erzeugt die App von selbst "
        "eine neue ID.",
    "Fit to window": "An Fenster anpassen",
    "Request view": "Ansehen anfragen",
    "Request control": "Steuern anfragen",
    "Request files": "Dateien anfragen",
    "Show my screen": "Meinen Bildschirm zeigen",
    "Send file ...": "Datei senden ...",
    "Folder for received files ...": "Ordner für empfangene Dateien ...",
    "Send keys": "Tasten senden",
    "Keys your own desktop would keep, sent to the remote screen (only while you have control)":
        "Tasten, die Ihr eigener Desktop für sich behielte, an den entfernten Bildschirm senden "
        "(nur solange Sie steuern dürfen)",
    "Ctrl+Alt+Del": "Strg+Alt+Entf",
    "Ctrl+Alt+Backspace": "Strg+Alt+Rücktaste",
    "Alt+Tab": "Alt+Tab",
    "Alt+F4": "Alt+F4",
    "Windows key (Super)": "Windows-Taste (Super)",
    "Ctrl+Esc": "Strg+Esc",
    "Ctrl+Shift+Esc": "Strg+Umschalt+Esc",
    "Print Screen": "Druck",
    "Alt+Print Screen": "Alt+Druck",
    "Comment for the protocol": "Kommentar für das Protokoll",
    "Rights: {rights}": "Rechte: {rights}",
    "none": "keine",
    "Session {time}": "Sitzung {time}",
    "Enroll this supporter module": "Dieses Supporter-Modul registrieren",
    "Enroll": "Registrieren",
    "Hosts: {count}, online: {online}": "Rechner: {count}, online: {online}",
    # host window
    "Hausmeister host": "Hausmeister-Rechner",
    "Online at {server}": "Online bei {server}",
    "Offline, reconnecting to {server}\u00a0…": "Offline, verbinde erneut mit {server}\u00a0…",
    "No session": "Keine Sitzung",
    "Session with {supporter}": "Sitzung mit {supporter}",
    "Policy": "Richtlinie",
    "allow": "erlauben",
    "deny": "verweigern",
    "ask": "fragen",
    "Supporters: {names}": "Supporter: {names}",
    "any supporter the server lets through": "jeder Supporter, den der Server zulässt",
    "The policy can be changed only by this host's administrator.":
        "Die Richtlinie kann nur die Administration dieses Rechners ändern.",
    "Set host password ...": "Rechner-Passwort setzen ...",
    "New session password (at least 8 characters):":
        "Neues Sitzungspasswort (mindestens 8 Zeichen):",
    "The session password is too short: use at least 8 characters.":
        "Das Sitzungspasswort ist zu kurz: mindestens 8 Zeichen.",
    "Session password set.": "Sitzungspasswort gesetzt.",
}


class CatalogueTranslator(QTranslator):
    """A ``QTranslator`` whose table is a Python dict (English source → translation)."""

    def __init__(self, table: dict[str, str], parent=None) -> None:
        super().__init__(parent)
        self.table = table

    def translate(self, context, source_text, disambiguation=None, n=-1):  # noqa: N802
        if context != CONTEXT:
            return None
        return self.table.get(source_text)

    def isEmpty(self) -> bool:  # noqa: N802
        return not self.table


_installed: CatalogueTranslator | None = None
_qt_installed: QTranslator | None = None     # Qt's own (the standard dialogs' buttons)
_language = "en"


def system_language() -> str:
    return "de" if QLocale.system().name().lower().startswith("de") else "en"


def install_translation(app, language: str | None = None) -> str:
    """Install the translator for ``language`` (None: the system locale); returns it."""
    global _installed, _qt_installed, _language
    language = language or system_language()
    _language = language
    for translator in (_installed, _qt_installed):
        if translator is not None:
            app.removeTranslator(translator)
    _installed = _qt_installed = None
    if language == "de":
        _installed = CatalogueTranslator(GERMAN, app)
        app.installTranslator(_installed)
        qt_own = QTranslator(app)
        if qt_own.load("qtbase_de", QLibraryInfo.path(QLibraryInfo.TranslationsPath)):
            _qt_installed = qt_own
            app.installTranslator(qt_own)
    return language


def locale():
    """The ``QLocale`` of the installed language (numbers, sizes, dates in the windows)."""
    return QLocale(QLocale.German, QLocale.Germany) if _language == "de" \
        else QLocale(QLocale.English, QLocale.UnitedStates)


def t(text: str) -> str:
    """The translation of ``text`` (an English source string) in the installed language."""
    return QCoreApplication.translate(CONTEXT, text)
