"""Small helpers below every other layer (L0): they import nothing else of vsc."""
