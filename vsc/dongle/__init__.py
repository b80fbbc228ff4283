"""Claim 10 without a server: the card on a duplication-protected PKCS#11 token (Figures 14 and 15)."""
