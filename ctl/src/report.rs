//! What a command hands back to `main`: a view for `--json`, the same
//! view as text for a person, what it found wrong, and the calls that
//! failed; and the exit code that follows from them.
//!
//! Exit codes, the same for every command:
//! - 0: the command ran and found nothing wrong;
//! - 1: it ran, and found something wrong where the command says what that
//!   is (`status`: a node not serving, something waiting for an operator;
//!   `audit`: the money is not the expected figure; a resolve whose answer
//!   is not RESOLVED);
//! - 2: a usage error (clap's own, or a flag tandemctl could not use: a
//!   missing node, an unreadable certificate, a URL of the wrong scheme);
//! - 3: a node could not be reached, or answered an error status. What the
//!   other nodes answered is still printed; each failure goes to stderr
//!   naming the node, the RPC, the gRPC code and message.

use crate::nodes::RpcError;
use serde::Serialize;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FOUND_WRONG: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_RPC_FAILED: u8 = 3;

pub struct Report {
    /// The view as one JSON document.
    pub json: String,
    /// The view for a person.
    pub text: String,
    /// What the command found wrong (also in the view, for `--json`).
    pub findings: Vec<String>,
    /// The calls that failed.
    pub errors: Vec<RpcError>,
}

impl Report {
    pub fn new<V: Serialize>(view: &V, text: String, findings: Vec<String>, errors: Vec<RpcError>) -> Report {
        // A view holds strings, numbers, booleans, options and vectors only
        // (no map with non-string keys), which always serialize.
        let json = serde_json::to_string_pretty(view).expect("a view of plain fields serializes");
        Report { json, text, findings, errors }
    }

    /// A command that learned nothing but the failure of its one call:
    /// nothing on stdout, the error on stderr.
    pub fn failed(error: RpcError) -> Report {
        Report { json: String::new(), text: String::new(), findings: Vec::new(), errors: vec![error] }
    }

    pub fn exit_code(&self) -> u8 {
        if !self.errors.is_empty() {
            EXIT_RPC_FAILED
        } else if !self.findings.is_empty() {
            EXIT_FOUND_WRONG
        } else {
            EXIT_OK
        }
    }
}
