"""Sign-in with the organisation's directory (LDAP, Active Directory).

``client`` talks to the directory (ldap3, blocking: always called through ``run_blocking``);
``signin`` is the one password check of the console and of supporter enrollment (local accounts
first, then the directory); ``sync`` periodically takes access away from directory users who
were removed from their group or disabled.  Not here: lock-out and TOTP (``accounts``,
``console.auth``), certificate revocation (``certificates``).
"""
