"""Local stand-ins for provider services that have no emulator, for tests only."""
