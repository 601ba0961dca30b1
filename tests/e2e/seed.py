#!/usr/bin/env python3
"""FALLBACK ONLY, for servers without the auth endpoints (before the auth branch merged):
insert a user and a live session straight into the SQLite database, the way
tests/common/mod.rs `create_user` does through the services. The test mints the matching
HS256 access token itself with data_dir/secrets/jwt.key.

usage: seed.py DB EMAIL ROLE NAME  ->  prints {"user_id","session_id","refresh_token"}
"""
import base64
import hashlib
import json
import os
import sqlite3
import sys
import time
import uuid

db, email, role, name = sys.argv[1:5]
now = int(time.time() * 1000)
user_id = uuid.uuid4().hex
session_id = uuid.uuid4().hex
refresh = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
con = sqlite3.connect(db, timeout=10)
con.execute("PRAGMA busy_timeout = 10000")
with con:
    con.execute(
        "INSERT INTO users (id, email, email_verified, name, password_hash, role, token_version,"
        " disabled, created_at, updated_at) VALUES (?, ?, 0, ?, NULL, ?, 0, 0, ?, ?)",
        (user_id, email, name or None, role, now, now),
    )
    con.execute(
        "INSERT INTO sessions (id, user_id, refresh_hash, refresh_expires_at, user_agent, ip,"
        " created_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (session_id, user_id, hashlib.sha256(refresh.encode()).digest(),
         now + 7 * 24 * 3600 * 1000, "e2e seed", "127.0.0.1", now, now),
    )
con.close()
print(json.dumps({"user_id": user_id, "session_id": session_id, "refresh_token": refresh}))
