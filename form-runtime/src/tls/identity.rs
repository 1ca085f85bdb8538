//! Who a certificate names: the kind of service and its id, written into the
//! certificate as a URI `spiffe://form.internal/<kind>/<id>` and a DNS name
//! `<kind>.form.internal` (what a client checks a server against, so a client that
//! dials form-state gets form-state and nothing else the CA signed).

use std::fmt;

/// The trust domain of every name in the platform's certificates.
pub const TRUST_DOMAIN: &str = "form.internal";

/// A kind of caller or server. Authorization is by kind (see [`crate::authz`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A form-state replica.
    State,
    /// A form-scaler controller.
    Scaler,
    /// A form-vmm-service node.
    Vmm,
    /// A form-rplb balancer.
    Rplb,
    /// The form-mcp gateway (REST and MCP).
    Gateway,
    /// A person with formctl.
    Operator,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 6] = [
        Kind::State,
        Kind::Scaler,
        Kind::Vmm,
        Kind::Rplb,
        Kind::Gateway,
        Kind::Operator,
    ];

    /// The name in certificates and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::State => "state",
            Kind::Scaler => "scaler",
            Kind::Vmm => "vmm",
            Kind::Rplb => "rplb",
            Kind::Gateway => "gateway",
            Kind::Operator => "operator",
        }
    }

    /// The kind named `s`; the error lists the names accepted.
    pub fn parse(s: &str) -> Result<Kind, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "'{s}' is not a kind of service; expected one of {}",
                    Kind::ALL.map(Kind::as_str).join(", ")
                )
            })
    }

    /// The kind a service binary runs as, from its name (`form-state` ...).
    pub fn of_service(name: &str) -> Option<Kind> {
        Some(match name {
            "form-state" => Kind::State,
            "form-scaler" => Kind::Scaler,
            "form-vmm-service" => Kind::Vmm,
            "form-rplb" => Kind::Rplb,
            "form-mcp" => Kind::Gateway,
            _ => return None,
        })
    }

    /// The DNS name every certificate of this kind carries, and that a client of a
    /// server of this kind asks for.
    pub fn dns_name(self) -> String {
        format!("{}.{TRUST_DOMAIN}", self.as_str())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The holder of a certificate: its kind and id (`state`, `state-1`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What it is.
    pub kind: Kind,
    /// Which one.
    pub id: String,
}

impl Identity {
    /// `kind`/`id`, with `id` checked by the one rule for ids.
    pub fn new(kind: Kind, id: &str) -> Result<Self, String> {
        crate::ids::check(id).map_err(|e| format!("id {e}"))?;
        Ok(Self {
            kind,
            id: id.to_owned(),
        })
    }

    /// The URI written in the certificate.
    pub fn uri(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}/{}", self.kind, self.id)
    }

    /// The identity a URI from a certificate names, if it is one of ours.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?.strip_prefix(TRUST_DOMAIN)?;
        let (kind, id) = rest.strip_prefix('/')?.split_once('/')?;
        Identity::new(Kind::parse(kind).ok()?, id).ok()
    }

    /// The identity of a DER certificate (its first URI of ours).
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("the certificate cannot be read: {e}"))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("its subject alternative names cannot be read: {e}"))?
            .ok_or("it has no subject alternative names")?;
        san.value
            .general_names
            .iter()
            .find_map(|n| match n {
                GeneralName::URI(u) => Identity::from_uri(u),
                _ => None,
            })
            .ok_or_else(|| {
                format!("it names no spiffe://{TRUST_DOMAIN}/<kind>/<id> among its names")
            })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_foreign_ones_are_refused() {
        let i = Identity::new(Kind::State, "state-1").expect("id");
        assert_eq!(i.uri(), "spiffe://form.internal/state/state-1");
        assert_eq!(Identity::from_uri(&i.uri()), Some(i));
        for bad in [
            "spiffe://other.org/state/state-1",
            "spiffe://form.internal/root/x",
            "spiffe://form.internal/state/../x",
            "spiffe://form.internal/state",
            "https://form.internal/state/x",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
        assert!(
            Kind::parse("nope")
                .expect_err("not a kind")
                .contains("gateway")
        );
    }
}
