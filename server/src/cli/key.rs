//! `engine key`: an Engine's versioned keys and their lifecycle.

use std::io::{self, Write};

use clap::{Args, Subcommand};
use continuity_proto::admin::engine_admin_client::EngineAdminClient;
use continuity_proto::admin::{
    CreateKeyRequest, EngineKey, KeyVersion, ListKeysRequest, RotateKeyRequest,
    SetKeyVersionStateRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

use super::error::CliError;
use super::key_import::{self, ImportArgs, ImportJobCommand};
use super::output::{Output, View, show};
use super::parse::{self, Algorithm, Purpose};

/// `engine key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key (version 1).
    Create {
        /// Engine.
        engine: String,
        /// Key name.
        key: String,
        /// sign | encrypt.
        #[arg(long, value_parser = parse::domain::<Purpose>)]
        purpose: Purpose,
        /// ec-p256 | rsa-2048 | rsa-3072 | aes-256-gcm.
        #[arg(long, value_parser = parse::domain::<Algorithm>)]
        algorithm: Option<Algorithm>,
        /// Automatic rotation period ("30d"); none when absent.
        #[arg(long)]
        rotation_period: Option<String>,
        /// Grace before a scheduled destruction ("24h" default).
        #[arg(long)]
        destroy_grace: Option<String>,
    },
    /// List keys and versions.
    List {
        /// Engine.
        engine: String,
    },
    /// Add a version and make it primary.
    Rotate {
        /// Engine.
        engine: String,
        /// Key.
        key: String,
    },
    /// DISABLED → ENABLED.
    Enable(VersionArgs),
    /// ENABLED → DISABLED.
    Disable(VersionArgs),
    /// Schedule destruction (after the key's grace).
    Destroy(VersionArgs),
    /// Cancel a scheduled destruction (→ DISABLED).
    Restore(VersionArgs),
    /// Import jobs: wrapping keys to import key material under.
    ImportJob {
        /// What to do.
        #[command(subcommand)]
        cmd: ImportJobCommand,
    },
    /// Import wrapped key material as a new primary version (it records `imported`).
    Import(ImportArgs),
}

/// A key version.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Engine.
    pub engine: String,
    /// Key.
    pub key: String,
    /// Version.
    #[arg(long)]
    pub version: u32,
}

type Client = EngineAdminClient<Channel>;

/// Runs an `engine key` command.
pub async fn run(c: &mut Client, out: Output, cmd: KeyCommand) -> Result<(), CliError> {
    let key = match cmd {
        KeyCommand::Create {
            engine,
            key,
            purpose,
            algorithm,
            rotation_period,
            destroy_grace,
        } => {
            let request = CreateKeyRequest {
                engine,
                name: key,
                purpose: purpose.as_str().into(),
                algorithm: algorithm.map(|a| a.as_str().into()).unwrap_or_default(),
                rotation_period: parse::seconds("--rotation-period", rotation_period.as_deref())?,
                destroy_grace: parse::seconds("--destroy-grace", destroy_grace.as_deref())?,
            };
            c.create_key(request).await?.into_inner()
        }
        KeyCommand::List { engine } => {
            let r = c.list_keys(ListKeysRequest { engine }).await?.into_inner();
            let keys = r.keys.iter().map(KeyView::from).collect();
            return show(out, &KeyList { keys });
        }
        KeyCommand::Rotate { engine, key } => {
            let request = RotateKeyRequest { engine, name: key };
            c.rotate_key(request).await?.into_inner()
        }
        KeyCommand::Enable(v) => set_state(c, "enable", v).await?,
        KeyCommand::Disable(v) => set_state(c, "disable", v).await?,
        KeyCommand::Destroy(v) => set_state(c, "destroy", v).await?,
        KeyCommand::Restore(v) => set_state(c, "restore", v).await?,
        KeyCommand::ImportJob { cmd } => return key_import::run_job(c, out, cmd).await,
        KeyCommand::Import(a) => key_import::run_import(c, a).await?,
    };
    show(out, &KeyView::from(&key))
}

async fn set_state(c: &mut Client, action: &str, v: VersionArgs) -> Result<EngineKey, CliError> {
    let request = SetKeyVersionStateRequest {
        engine: v.engine,
        name: v.key,
        version: v.version,
        action: action.into(),
    };
    Ok(c.set_key_version_state(request).await?.into_inner())
}

/// A key and its versions as printed.
#[derive(Debug, Serialize)]
struct KeyView<'a> {
    engine: &'a str,
    name: &'a str,
    purpose: &'a str,
    algorithm: &'a str,
    custody: &'a str,
    primary_version: u32,
    rotation_period: i64,
    destroy_grace: i64,
    versions: Vec<VersionView<'a>>,
}

/// A key version as printed.
#[derive(Debug, Serialize)]
struct VersionView<'a> {
    version: u32,
    state: &'a str,
    kid: &'a str,
    created_at: i64,
    destroy_at: i64,
    encryptions: u64,
    /// Shown only when set (older output stays as it was).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    imported: bool,
}

impl<'a> From<&'a EngineKey> for KeyView<'a> {
    fn from(k: &'a EngineKey) -> Self {
        Self {
            engine: &k.engine,
            name: &k.name,
            purpose: &k.purpose,
            algorithm: &k.algorithm,
            custody: &k.custody,
            primary_version: k.primary_version,
            rotation_period: k.rotation_period,
            destroy_grace: k.destroy_grace,
            versions: k.versions.iter().map(VersionView::from).collect(),
        }
    }
}

impl<'a> From<&'a KeyVersion> for VersionView<'a> {
    fn from(v: &'a KeyVersion) -> Self {
        Self {
            version: v.version,
            state: &v.state,
            kid: &v.kid,
            created_at: v.created_at,
            destroy_at: v.destroy_at,
            encryptions: v.encryptions,
            imported: v.imported,
        }
    }
}

impl View for KeyView<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(
            w,
            "Key {}/{} ({} {}, {} custody), primary version {}",
            self.engine,
            self.name,
            self.purpose,
            self.algorithm,
            self.custody,
            self.primary_version
        )?;
        for v in &self.versions {
            let when = if v.destroy_at > 0 {
                format!(" (destroyed at {})", v.destroy_at)
            } else {
                String::new()
            };
            let count = if self.purpose == "encrypt" {
                format!(" encryptions {}", v.encryptions)
            } else {
                String::new()
            };
            let imported = if v.imported { " imported" } else { "" };
            let (version, state, kid) = (v.version, v.state, v.kid);
            writeln!(
                w,
                "  v{version:<4} {state:<18} kid {kid}{count}{imported}{when}"
            )?;
        }
        Ok(())
    }
}

/// What `engine key list` prints.
#[derive(Debug, Serialize)]
struct KeyList<'a> {
    keys: Vec<KeyView<'a>>,
}

impl View for KeyList<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        self.keys.iter().try_for_each(|k| k.text(w))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::output::rendered;
    use super::*;

    fn key(purpose: &str) -> EngineKey {
        let version = |v: u32, state: &str, destroy_at: i64| KeyVersion {
            version: v,
            state: state.into(),
            kid: format!("k-v{v}"),
            created_at: 10,
            destroy_at,
            encryptions: 7,
            imported: false,
        };
        EngineKey {
            engine: "books".into(),
            name: "k".into(),
            purpose: purpose.into(),
            algorithm: "aes-256-gcm".into(),
            custody: "transit".into(),
            primary_version: 2,
            rotation_period: 0,
            destroy_grace: 3600,
            versions: vec![
                version(1, "DESTROY_SCHEDULED", 99),
                version(2, "ENABLED", 0),
            ],
        }
    }

    #[test]
    fn key_json_is_what_it_always_was() {
        let k = key("encrypt");
        let v = |v: u32, state: &str, destroy_at: i64| {
            json!({"version": v, "state": state, "kid": format!("k-v{v}"), "created_at": 10,
                   "destroy_at": destroy_at, "encryptions": 7})
        };
        let before = json!({
            "engine": "books", "name": "k", "purpose": "encrypt", "algorithm": "aes-256-gcm",
            "custody": "transit", "primary_version": 2, "rotation_period": 0,
            "destroy_grace": 3600,
            "versions": [v(1, "DESTROY_SCHEDULED", 99), v(2, "ENABLED", 0)],
        });
        assert_eq!(
            rendered(Output::Json, &KeyView::from(&k)),
            format!("{before}\n")
        );
        let list = KeyList {
            keys: vec![KeyView::from(&k)],
        };
        let expected = format!("{}\n", json!({ "keys": [before] }));
        assert_eq!(rendered(Output::Json, &list), expected);
    }

    #[test]
    fn key_text_is_what_it_always_was() {
        let head = "Key books/k (encrypt aes-256-gcm, transit custody), primary version 2\n";
        assert_eq!(
            rendered(Output::Text, &KeyView::from(&key("encrypt"))),
            format!(
                "{head}  v1    DESTROY_SCHEDULED  kid k-v1 encryptions 7 (destroyed at 99)\n  \
                 v2    ENABLED            kid k-v2 encryptions 7\n"
            )
        );
        let sign = rendered(Output::Text, &KeyView::from(&key("sign")));
        assert!(
            sign.ends_with("  v2    ENABLED            kid k-v2\n"),
            "{sign}"
        );
    }

    #[test]
    fn an_imported_version_says_so_in_text_and_json() {
        let mut k = key("sign");
        k.versions[1].imported = true;
        let text = rendered(Output::Text, &KeyView::from(&k));
        assert!(
            text.ends_with("  v2    ENABLED            kid k-v2 imported\n"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&rendered(Output::Json, &KeyView::from(&k))).unwrap();
        assert_eq!(json["versions"][1]["imported"], true);
        assert!(json["versions"][0].get("imported").is_none());
    }
}
