"""(being built: see the module owner's commit)."""
