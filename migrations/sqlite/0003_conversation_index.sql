-- Continuing a site conversation looks up the exchange a history extends.
CREATE INDEX chat_history_prefix ON chat_history(prefix_hash);
