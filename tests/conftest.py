"""Shared fixtures: real databases (SQLite and a throwaway PostgreSQL), real servers on loopback."""

pytest_plugins = ["tests.fixtures_db", "tests.fixtures_server", "tests.fixtures_console", "tests.fixtures_mail",
                  "tests.fixtures_qt"]
