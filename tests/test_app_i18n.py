"""Every string the three apps show has its German translation (issue 11 §5): the English
source strings are found in the code (``t("...")`` calls and the tables the windows translate
through ``t(name)``) and looked up in the German catalogue.  No Qt, no display: a parse.  Then
the file-transfer reasons the session core makes in English, said in the window's language."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP_FILES = [ROOT / "modules" / "supporter" / "gui.py",
             ROOT / "modules" / "supporter" / "adhoc_panel.py", ROOT / "modules" / "customer" / "gui.py",
             ROOT / "modules" / "remote_host" / "gui.py",
             *sorted((ROOT / "modules" / "common" / "qt").glob("*.py"))]


def source_strings() -> set[str]:
    found: set[str] = set()
    for path in APP_FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "t" and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                found.add(node.args[0].value)
    # the supporter's toolbar: ("key", "English text", slot) rows, translated as t(text)
    toolbar = (ROOT / "modules" / "supporter" / "gui.py").read_text(encoding="utf-8")
    found |= set(re.findall(r'\("\w+", "([^"]+)", (?:lambda|self\.)', toolbar))
    from modules.common.qt.consent_dialogs import END_SENTENCES, QUESTIONS, REASONS
    found |= {text for pair in END_SENTENCES.values() for text in pair} | set(REASONS)
    from modules.common.qt.viewer import REMOTE_KEY_COMBOS
    from modules.common.qt.window_picker import BUTTON_TEXT
    found.add(BUTTON_TEXT)
    from modules.common.qt.recording_upload import UPLOAD_LINES
    found |= set(UPLOAD_LINES.values())
    from modules.common.qt.error_text import SENTENCES, WRONG_SECRET
    found |= set(SENTENCES.values()) | {WRONG_SECRET}
    from modules.common.qt.file_reasons import OS_PROBLEMS
    from modules.common.session.file_transfer import REASON_TEMPLATES
    found |= set(REASON_TEMPLATES) | set(OS_PROBLEMS)
    from modules.common.session.consent import Right
    from modules.remote_host import settings
    found |= set(QUESTIONS.values()) | {label for label, _ in REMOTE_KEY_COMBOS}
    found |= {r.value for r in Right} | set(settings.RIGHTS) | set(settings.CHOICES)
    return found


def test_every_app_string_has_a_german_translation():
    from modules.common.qt.i18n import GERMAN
    strings = source_strings()
    assert len(strings) > 100                       # the scan finds the apps' strings
    missing = sorted(s for s in strings if s not in GERMAN)
    assert missing == []


def test_placeholders_survive_the_translation():
    from modules.common.qt.i18n import GERMAN
    field = re.compile(r"\{(\w*)\}")
    wrong = {en: de for en, de in GERMAN.items()
             if sorted(field.findall(en)) != sorted(field.findall(de))}
    assert wrong == {}


def test_a_file_reason_is_said_in_the_window_language(qt_app):
    from modules.common.qt.file_reasons import file_reason
    from modules.common.qt.i18n import install_translation
    from modules.common.session import file_transfer as ft
    peer = ft.CANCELLED_BY_PEER.format(reason=ft.CANCELLED_BY_CUSTOMER)
    full = ft.CANNOT_WRITE.format(problem="No space left on device")
    space = ft.NO_SPACE.format(needed=5000, free=12)
    install_translation(qt_app, "de")
    try:
        assert file_reason(ft.CANCELLED_BY_SUPPORTER) == "vom Supporter abgebrochen"
        assert file_reason(peer) == "von der Gegenseite abgebrochen (vom Kunden abgebrochen)"
        assert file_reason(full) == ("die Datei lässt sich nicht schreiben: kein Platz mehr auf "
                                     "dem Datenträger")
        assert file_reason(space) == "nicht genug freier Speicherplatz (5000 Bytes nötig, 12 frei)"
        # a peer's own words (a newer module's) stay as they came, braces and all
        assert file_reason(ft.CANCELLED_BY_PEER.format(reason="{x} new")) == \
            "von der Gegenseite abgebrochen ({x} new)"
    finally:
        install_translation(qt_app, "en")
    assert file_reason(peer) == peer and file_reason(space) == space
