//! The one type of the errors the bus sends its clients. The standard D-Bus errors are
//! [`zbus::fdo::Error`]'s, so that no error name is spelt out anywhere in the bus; the only
//! other kind is an error named by someone else, which the bus passes on without knowing it
//! in advance (systemd's `ActivationFailure` carries the name of systemd's own error).

use std::fmt;

use zbus::DBusError;
use zbus::fdo;
use zbus::names::{ErrorName, OwnedErrorName};

/// An error the bus answers a call with (or, for a held signal, tells its sender).
#[derive(Debug, Clone, PartialEq)]
pub enum BusError {
    /// One of the errors of the D-Bus specification, with its message.
    Standard(fdo::Error),
    /// An error another party named: the bus does not know its name in advance.
    Foreign { name: OwnedErrorName, text: String },
}

impl BusError {
    /// An error named by another party (the name is validated by its type).
    pub fn foreign(name: OwnedErrorName, text: String) -> BusError {
        BusError::Foreign { name, text }
    }

    /// The error's D-Bus name.
    pub fn name(&self) -> ErrorName<'_> {
        match self {
            BusError::Standard(e) => e.name(),
            BusError::Foreign { name, .. } => name.as_ref(),
        }
    }

    /// The message that goes with the error, the error reply's one string argument.
    pub fn text(&self) -> &str {
        match self {
            BusError::Standard(e) => e.description().unwrap_or_default(),
            BusError::Foreign { text, .. } => text,
        }
    }
}

impl From<fdo::Error> for BusError {
    fn from(e: fdo::Error) -> BusError {
        BusError::Standard(e)
    }
}

/// The message alone: the bus logs its errors as the client reads them, without the name.
impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

impl std::error::Error for BusError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_errors_carry_the_specification_names() {
        let cases = [
            (
                fdo::Error::SpawnExecFailed("x".into()),
                "org.freedesktop.DBus.Error.Spawn.ExecFailed",
            ),
            (
                fdo::Error::SpawnChildExited("x".into()),
                "org.freedesktop.DBus.Error.Spawn.ChildExited",
            ),
            (
                fdo::Error::SELinuxSecurityContextUnknown("x".into()),
                "org.freedesktop.DBus.Error.SELinuxSecurityContextUnknown",
            ),
            (
                fdo::Error::AdtAuditDataUnknown("x".into()),
                "org.freedesktop.DBus.Error.AdtAuditDataUnknown",
            ),
            (
                fdo::Error::LimitsExceeded("x".into()),
                "org.freedesktop.DBus.Error.LimitsExceeded",
            ),
        ];
        for (error, name) in cases {
            let error = BusError::from(error);
            assert_eq!(error.name(), name);
            assert_eq!(error.text(), "x");
        }
    }

    #[test]
    fn a_foreign_error_keeps_its_name_and_text() {
        let name = OwnedErrorName::try_from("org.freedesktop.systemd1.NoSuchUnit").unwrap();
        let error = BusError::foreign(name, "Unit x.service not found.".into());
        assert_eq!(error.name(), "org.freedesktop.systemd1.NoSuchUnit");
        assert_eq!(error.to_string(), "Unit x.service not found.");
    }
}
