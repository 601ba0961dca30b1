-- A user's pending one-time tokens, found without a scan: a password change or reset
-- uses up every pending reset link of the user in the same write.
CREATE INDEX one_time_tokens_user ON one_time_tokens(user_id, purpose) WHERE used_at IS NULL;
