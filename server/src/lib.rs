//! The `arbor` binary's library half: draft loading shared by its commands, and the
//! OpenAI-compatible HTTP server ([`http`]) that `arbor serve` runs, and the KV-cache policy
//! settings ([`kv`]) they share.

pub mod coarse;
pub mod drafts;
pub mod http;
pub mod kv;
