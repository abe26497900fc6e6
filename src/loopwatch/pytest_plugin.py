"""pytest plugin: fail a test when the code under test blocks the loop (filled in by the testing issue)."""
