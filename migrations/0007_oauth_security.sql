-- OAuth security (audit items): identities linked while the account's email was not yet
-- verified by warpbase are remembered, so that proving the address (password reset,
-- email verification) can remove them; sessions record when their user last signed in
-- (not refreshed), for step-up checks.

-- 1 = linked while the account's email was unverified; removed when warpbase verifies it.
ALTER TABLE identities ADD COLUMN linked_unverified INTEGER NOT NULL DEFAULT 0;
-- Identities that already sit on unverified accounts are treated the same way.
UPDATE identities SET linked_unverified = 1
 WHERE user_id IN (SELECT id FROM users WHERE email_verified = 0);

-- When the session's user authenticated (sign-in or OAuth exchange; refresh keeps it).
-- NULL (sessions from before this migration) counts as long ago.
ALTER TABLE sessions ADD COLUMN auth_time INTEGER;

-- OAuth flows are bound to the browser that started them (RFC 9700 §4.7): the SHA-256 of
-- a random value kept in an HttpOnly cookie, stored with the state and, after the
-- callback, with the exchange code. NULL never matches (rows from before this migration).
ALTER TABLE oauth_states ADD COLUMN browser_hash BLOB;
ALTER TABLE one_time_tokens ADD COLUMN browser_hash BLOB;
