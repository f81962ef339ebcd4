//! The peer replication link: framing, messages, authentication (issue 3).
