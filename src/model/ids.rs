//! Validated identifiers and amounts: once constructed they are known to be well-formed, so no
//! other part of creditd re-checks them.

use std::fmt;
use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

/// Longest id accepted, in bytes.
pub const ID_BYTES_MAX: usize = 64;

/// The id rule as the caller reads it in a refusal, after the field's name.
pub const ID_RULE: &str = "must be 1 to 64 characters of A-Z a-z 0-9 . _ : -";
const _: () = assert!(ID_BYTES_MAX == 64, "ID_RULE names the length");

/// Largest amount in one call: 10^15 stays exact in a JSON double.
pub const AMOUNT_MAX: u64 = 1_000_000_000_000_000;

/// Why an id or amount was refused; the text is shown to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("{field} {ID_RULE}")]
    Id { field: &'static str },
    #[error("{field} must be an integer from 1 to {AMOUNT_MAX}")]
    Amount { field: &'static str },
}

/// True if `s` is a valid id: 1 to 64 bytes of `A-Z a-z 0-9 . _ : -`.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= ID_BYTES_MAX
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Box<str>);

        impl $name {
            /// Checks `s` and wraps it; `field` names it in the error.
            pub fn parse(s: &str, field: &'static str) -> Result<Self, InvalidInput> {
                if is_valid_id(s) {
                    Ok(Self(s.into()))
                } else {
                    Err(InvalidInput::Id { field })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidInput;
            fn try_from(s: String) -> Result<Self, InvalidInput> {
                Self::parse(&s, stringify!($name))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.into()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// An organization: holds workspaces, one mode and one Primary Workspace.
    OrgId
);
id_type!(
    /// A workspace of an org: a team, client or project that consumes credits.
    WorkspaceId
);
id_type!(
    /// A creditd node of a cluster; leases and settle batches are kept per node.
    NodeId
);

/// An amount given in one call: 1 to [`AMOUNT_MAX`] credits. Zero is unrepresentable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Amount(NonZeroU64);

impl Amount {
    pub fn new(n: u64) -> Option<Self> {
        if n > AMOUNT_MAX {
            return None;
        }
        NonZeroU64::new(n).map(Self)
    }

    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl TryFrom<u64> for Amount {
    type Error = InvalidInput;
    fn try_from(n: u64) -> Result<Self, InvalidInput> {
        Self::new(n).ok_or(InvalidInput::Amount { field: "amount" })
    }
}

impl From<Amount> for u64 {
    fn from(a: Amount) -> u64 {
        a.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_documented_charset_only() {
        assert!(is_valid_id("acme"));
        assert!(is_valid_id("A-z_0.9:x"));
        assert!(is_valid_id(&"a".repeat(64)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(&"a".repeat(65)));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("é"));
    }

    #[test]
    fn amounts_are_one_to_ten_to_the_fifteen() {
        assert!(Amount::new(0).is_none());
        assert_eq!(Amount::new(1).map(Amount::get), Some(1));
        assert_eq!(Amount::new(AMOUNT_MAX).map(Amount::get), Some(AMOUNT_MAX));
        assert!(Amount::new(AMOUNT_MAX + 1).is_none());
    }
}
