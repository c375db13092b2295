//! Who may connect: the engine's side of authentication.
//!
//! The engine decides what needs no I/O — a client whose transport vouched for it (a verified
//! TLS certificate), and anonymous clients under [`Anonymous`] — and hands every other CONNECT
//! with credentials to the runtime as an [`AuthRequest`] (the check may be slow: a salted hash,
//! later a remote backend). The connection waits, unread, until the runtime answers with
//! [`crate::engine::Engine::auth_done`]. Gateways' clients connect through the same path, so
//! one policy covers every protocol.

use bytes::Bytes;
use std::net::IpAddr;

/// Which clients without credentials are let in (`auth.allow_anonymous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Anonymous {
    /// Every one.
    Allow,
    /// None.
    Deny,
    /// Those connecting from a loopback address (127.0.0.0/8, ::1).
    #[default]
    Loopback,
}

impl Anonymous {
    /// Whether an anonymous client from `peer` is let in.
    pub fn admits(self, peer: IpAddr) -> bool {
        match self {
            Anonymous::Allow => true,
            Anonymous::Deny => false,
            Anonymous::Loopback => peer.to_canonical().is_loopback(),
        }
    }
}

/// The engine's authentication settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuthPolicy {
    /// Clients without credentials.
    pub anonymous: Anonymous,
    /// A backend checks credentials (a password file, …). Without one, credentials cannot be
    /// verified and their client is anonymous.
    pub verify_credentials: bool,
}

/// A CONNECT's credentials, for the runtime to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRequest {
    /// The connection waiting for the answer.
    pub conn: crate::engine::ConnId,
    /// Client id.
    pub client_id: String,
    /// Username, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Bytes>,
    /// The client's address.
    pub peer: IpAddr,
    /// The runtime's number of the listener that accepted it.
    pub listener: u16,
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Let in.
    Allow,
    /// Unknown user or wrong password (CONNACK 0x04).
    BadCredentials,
    /// Known, but not allowed to connect (CONNACK 0x05).
    NotAuthorized,
}

/// What the engine does with a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthStep {
    /// Let in now.
    Allow,
    /// Refuse now.
    Refuse(AuthOutcome),
    /// Ask the runtime.
    Check,
}

impl AuthPolicy {
    /// The step for a client from `peer`; `vouched`: its transport named it (a verified
    /// certificate); `credentials`: its CONNECT carries a username or a password.
    pub(crate) fn step(self, peer: IpAddr, vouched: bool, credentials: bool) -> AuthStep {
        if vouched {
            AuthStep::Allow
        } else if credentials && self.verify_credentials {
            AuthStep::Check
        } else if self.anonymous.admits(peer) {
            AuthStep::Allow
        } else {
            AuthStep::Refuse(AuthOutcome::NotAuthorized)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_table() {
        let lo: IpAddr = "127.0.0.9".parse().unwrap_or(IpAddr::from([127, 0, 0, 9]));
        let mapped: IpAddr = "::ffff:127.0.0.1"
            .parse()
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let remote = IpAddr::from([10, 0, 0, 7]);
        let p = |anonymous, verify_credentials| AuthPolicy {
            anonymous,
            verify_credentials,
        };
        use AuthStep::*;
        let refuse = Refuse(AuthOutcome::NotAuthorized);
        // (policy, peer, vouched, credentials) → step
        let table = [
            (p(Anonymous::Loopback, false), lo, false, false, Allow),
            (p(Anonymous::Loopback, false), mapped, false, false, Allow),
            (
                p(Anonymous::Loopback, false),
                IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
                false,
                false,
                Allow,
            ),
            (p(Anonymous::Loopback, false), remote, false, false, refuse),
            // Credentials nobody can check make a client anonymous.
            (p(Anonymous::Loopback, false), remote, false, true, refuse),
            (p(Anonymous::Loopback, true), remote, false, true, Check),
            (p(Anonymous::Deny, true), lo, false, false, refuse),
            (p(Anonymous::Deny, true), lo, false, true, Check),
            (p(Anonymous::Allow, false), remote, false, false, Allow),
            (p(Anonymous::Allow, true), remote, false, true, Check),
            // A verified certificate is the credential.
            (p(Anonymous::Deny, true), remote, true, false, Allow),
        ];
        for (policy, peer, vouched, credentials, want) in table {
            assert_eq!(
                policy.step(peer, vouched, credentials),
                want,
                "{policy:?} {peer} vouched={vouched} credentials={credentials}"
            );
        }
    }
}
