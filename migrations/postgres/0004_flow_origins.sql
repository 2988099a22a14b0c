-- Origins besides the account's own that a flow's calls may reach, recorded when this machine
-- learned the flow from the site's own page. Never filled from a flow file (see pinning.rs).
CREATE TABLE flow_origins (
    flow_id         TEXT NOT NULL REFERENCES chat_flows(id) ON DELETE CASCADE,
    origin          TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (flow_id, origin)
);
