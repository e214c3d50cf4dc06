//! `authority x509|jwt show|prepare|activate|taint|revoke`: forced rotation of the trust
//! domain's authorities, as SPIRE's `localauthority`. `show --output json` prints
//! `{"active": {...}, "prepared": {...}, "old": {...}}` (absent slots left out); each change
//! prints `{"<step>_authority": {...}}` (prepared, activated, tainted, revoked).

use clap::Subcommand;
use continuity_proto::admin::authority_admin_client::AuthorityAdminClient;
use continuity_proto::admin::{
    AuthorityChangeResponse, AuthorityIdRequest, AuthorityKind, AuthorityState,
    GetAuthorityStateRequest, PrepareAuthorityRequest,
};
use tonic::transport::Channel;

use super::error::CliError;
use super::output::{Output, View, show};

/// `authority` subcommands: which authority.
#[derive(Debug, Subcommand)]
pub enum AuthorityCommand {
    /// The X.509 CA (authority ID: its subject key identifier, hex).
    #[command(subcommand)]
    X509(AuthorityStep),
    /// The JWT signing key (authority ID: its kid).
    #[command(subcommand)]
    Jwt(AuthorityStep),
}

/// What to do with the authority.
#[derive(Debug, Subcommand)]
pub enum AuthorityStep {
    /// The active, prepared and old authority.
    Show,
    /// Prepare a new authority now (published in the bundle, not yet signing).
    Prepare,
    /// Make the prepared authority active (the active one becomes old).
    Activate {
        /// The prepared authority's ID.
        #[arg(
            long = "authority-id",
            alias = "authorityID",
            allow_hyphen_values = true
        )]
        authority_id: String,
    },
    /// Taint the old authority: every agent replaces the SVIDs it signed.
    Taint {
        /// The old authority's ID.
        #[arg(
            long = "authority-id",
            alias = "authorityID",
            allow_hyphen_values = true
        )]
        authority_id: String,
    },
    /// Remove a tainted authority from the bundle, once no live agent serves what it signed.
    Revoke {
        /// The tainted authority's ID.
        #[arg(
            long = "authority-id",
            alias = "authorityID",
            allow_hyphen_values = true
        )]
        authority_id: String,
        /// Remove it even while agents still serve what it signed or have not synced since
        /// the taint (audited as a forced revoke).
        #[arg(long)]
        force: bool,
    },
}

/// One authority, as printed.
#[derive(Debug, serde::Serialize)]
struct Authority {
    authority_id: String,
    expires_at: i64,
    state: String,
}

impl From<AuthorityState> for Authority {
    fn from(s: AuthorityState) -> Self {
        Self {
            authority_id: s.authority_id,
            expires_at: s.expires_at,
            state: s.state,
        }
    }
}

impl Authority {
    fn write(&self, w: &mut dyn std::io::Write, title: &str) -> std::io::Result<()> {
        writeln!(w, "{title}:")?;
        writeln!(w, "  Authority ID: {}", self.authority_id)?;
        writeln!(w, "  Expires at: {}", self.expires_at)?;
        writeln!(w, "  State: {}", self.state)
    }
}

/// `show`: the three slots.
#[derive(Debug, serde::Serialize)]
struct Slots {
    #[serde(skip_serializing_if = "Option::is_none")]
    active: Option<Authority>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prepared: Option<Authority>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old: Option<Authority>,
    #[serde(skip)]
    kind: &'static str,
}

impl View for Slots {
    fn text(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        for (slot, a) in [
            ("Active", &self.active),
            ("Prepared", &self.prepared),
            ("Old", &self.old),
        ] {
            match a {
                Some(a) => a.write(w, &format!("{slot} {} authority", self.kind))?,
                None => writeln!(
                    w,
                    "No {} {} authority found",
                    slot.to_lowercase(),
                    self.kind
                )?,
            }
        }
        Ok(())
    }
}

/// A change: `{"<step>_authority": {...}}`.
#[derive(Debug)]
struct Changed {
    step: &'static str,
    kind: &'static str,
    authority: Authority,
}

impl serde::Serialize for Changed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(&format!("{}_authority", self.step), &self.authority)?;
        m.end()
    }
}

impl View for Changed {
    fn text(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut title = format!("{} {} authority", self.step, self.kind);
        title[..1].make_ascii_uppercase();
        self.authority.write(w, &title)
    }
}

/// Runs an `authority` command.
pub async fn run(ch: Channel, out: Output, cmd: AuthorityCommand) -> Result<(), CliError> {
    let (kind, label, step) = match cmd {
        AuthorityCommand::X509(s) => (AuthorityKind::X509, "X.509", s),
        AuthorityCommand::Jwt(s) => (AuthorityKind::Jwt, "JWT", s),
    };
    let mut client = AuthorityAdminClient::new(ch);
    let kind = kind as i32;
    if let AuthorityStep::Show = step {
        let r = client
            .get_authority_state(GetAuthorityStateRequest { kind })
            .await?
            .into_inner();
        let slots = Slots {
            active: r.active.map(Into::into),
            prepared: r.prepared.map(Into::into),
            old: r.old.map(Into::into),
            kind: label,
        };
        return show(out, &slots);
    }
    let (name, r) = change(&mut client, kind, step).await?;
    let authority = r
        .authority
        .ok_or_else(|| CliError::Argument("the server answered without the authority".into()))?;
    show(
        out,
        &Changed {
            step: name,
            kind: label,
            authority: authority.into(),
        },
    )
}

/// Sends a changing step (`prepare`, `activate`, `taint`, `revoke`); its past-tense name and
/// the answer.
async fn change(
    client: &mut AuthorityAdminClient<Channel>,
    kind: i32,
    step: AuthorityStep,
) -> Result<(&'static str, AuthorityChangeResponse), CliError> {
    let id = |authority_id: String, force: bool| AuthorityIdRequest {
        kind,
        authority_id,
        force,
    };
    let (name, r) = match step {
        AuthorityStep::Show => {
            return Err(CliError::Argument("`show` changes nothing".into()));
        }
        AuthorityStep::Prepare => (
            "prepared",
            client
                .prepare_authority(PrepareAuthorityRequest { kind })
                .await?,
        ),
        AuthorityStep::Activate { authority_id } => (
            "activated",
            client.activate_authority(id(authority_id, false)).await?,
        ),
        AuthorityStep::Taint { authority_id } => (
            "tainted",
            client.taint_authority(id(authority_id, false)).await?,
        ),
        AuthorityStep::Revoke {
            authority_id,
            force,
        } => (
            "revoked",
            client.revoke_authority(id(authority_id, force)).await?,
        ),
    };
    Ok((name, r.into_inner()))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};
    use super::*;

    /// A JWT authority ID is a base64url kid, which may start with '-'.
    #[test]
    fn an_authority_id_may_start_with_a_hyphen() {
        for step in ["activate", "taint", "revoke"] {
            let cli = Cli::try_parse_from([
                "continuity-server",
                "authority",
                "jwt",
                step,
                "--authority-id",
                "-MS2SCiY56Lhp7shl253MA",
                "--output",
                "json",
            ])
            .unwrap_or_else(|e| panic!("{step}: {e}"));
            let Command::Authority(AuthorityCommand::Jwt(s)) = cli.command else {
                panic!("{step}: not an authority command");
            };
            let id = match s {
                AuthorityStep::Activate { authority_id }
                | AuthorityStep::Taint { authority_id }
                | AuthorityStep::Revoke { authority_id, .. } => authority_id,
                other => panic!("{step}: {other:?}"),
            };
            assert_eq!(id, "-MS2SCiY56Lhp7shl253MA");
            assert_eq!(cli.output, Output::Json);
        }
    }
}
