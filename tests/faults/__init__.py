"""The fault suite: kill -9 of servers and cards, dropped connections, a PostgreSQL restart (all bounded)."""
