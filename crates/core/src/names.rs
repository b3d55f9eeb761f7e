//! Names of services and namespaces.
//!
//! Names appear in hostnames (`http://payments/`), metric labels and SPIFFE IDs, so they follow the
//! DNS-1123 label rules Kubernetes uses: lowercase alphanumerics and `-`, 1–63 characters,
//! starting and ending with an alphanumeric. Validating once here keeps label cardinality and
//! identity formatting safe everywhere else.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most 63 characters (got {0})")]
    TooLong(usize),
    #[error("must contain only lowercase letters, digits and '-' (found {0:?})")]
    InvalidChar(char),
    #[error("must start and end with a lowercase letter or digit")]
    BadEdge,
}

fn validate_dns_label(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > 63 {
        return Err(NameError::TooLong(s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::InvalidChar(c));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(NameError::BadEdge);
    }
    Ok(())
}

macro_rules! dns_label_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                validate_dns_label(&s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

dns_label_newtype!(
    /// The name of a service: what apps call (`http://payments/`) and what metrics are labelled by.
    ServiceName
);
dns_label_newtype!(
    /// A namespace groups services; part of every identity.
    Namespace
);

impl Default for Namespace {
    fn default() -> Self {
        Self("default".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "payments", "web-v2", "0abc", &"x".repeat(63)] {
            assert!(ServiceName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names_with_reason() {
        assert_eq!(ServiceName::new(""), Err(NameError::Empty));
        assert_eq!(
            ServiceName::new("x".repeat(64)),
            Err(NameError::TooLong(64))
        );
        assert_eq!(ServiceName::new("Pay"), Err(NameError::InvalidChar('P')));
        assert_eq!(ServiceName::new("a.b"), Err(NameError::InvalidChar('.')));
        assert_eq!(ServiceName::new("-a"), Err(NameError::BadEdge));
        assert_eq!(ServiceName::new("a-"), Err(NameError::BadEdge));
        assert_eq!(ServiceName::new("é"), Err(NameError::InvalidChar('é')));
    }
}
