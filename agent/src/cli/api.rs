//! `api`: the Workload API, as any SPIFFE client sees it.

use std::io::{self, Write};
use std::path::PathBuf;

use clap::Subcommand;
use continuity_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use continuity_proto::workload::{
    JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest, X509svidRequest,
};
use serde::Serialize;
use serde_json::Value;
use tonic::transport::Channel;

use super::connect::{channel, req};
use super::error::CliError;
use super::output::{Output, View, show};
use super::x509::{self, X509View};

/// `api` subcommands.
#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Fetch SVIDs.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validate something.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Print X509-SVID updates as they arrive.
    Watch,
}

/// `api fetch` subcommands.
#[derive(Debug, Subcommand)]
pub enum FetchCommand {
    /// X509-SVIDs and bundle.
    X509 {
        /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// JWT-SVIDs.
    Jwt {
        /// Audience (repeatable).
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}

/// `api validate` subcommands.
#[derive(Debug, Subcommand)]
pub enum ValidateCommand {
    /// Validate a JWT-SVID.
    Jwt {
        /// Expected audience.
        #[arg(long)]
        audience: String,
        /// The token.
        #[arg(long)]
        svid: String,
    },
}

type Client = SpiffeWorkloadApiClient<Channel>;

/// Runs an `api` command against the socket `socket` (see [`super::socket_path`]).
pub async fn run(socket: Option<String>, out: Output, cmd: ApiCommand) -> Result<(), CliError> {
    let mut c = SpiffeWorkloadApiClient::new(channel(socket).await?);
    match cmd {
        ApiCommand::Fetch(FetchCommand::X509 { write }) => {
            let mut stream = c
                .fetch_x509svid(req(X509svidRequest {}))
                .await?
                .into_inner();
            let resp = stream
                .message()
                .await?
                .ok_or_else(|| tonic::Status::unavailable("stream ended"))?;
            if let Some(dir) = write {
                x509::write(&dir, &resp)?;
            }
            show(out, &X509View::from(&resp))
        }
        ApiCommand::Fetch(FetchCommand::Jwt {
            audience,
            spiffe_id,
        }) => fetch_jwt(&mut c, out, audience, spiffe_id).await,
        ApiCommand::Validate(ValidateCommand::Jwt { audience, svid }) => {
            let request = req(ValidateJwtsvidRequest { audience, svid });
            let r = c.validate_jwtsvid(request).await?.into_inner();
            let claims = r.claims.map(struct_json).unwrap_or_default();
            show(
                out,
                &Validated {
                    spiffe_id: r.spiffe_id,
                    claims,
                },
            )
        }
        ApiCommand::Watch => {
            let mut stream = c
                .fetch_x509svid(req(X509svidRequest {}))
                .await?
                .into_inner();
            while let Some(resp) = stream.message().await? {
                show(out, &X509View::from(&resp))?;
            }
            Ok(())
        }
    }
}

async fn fetch_jwt(
    c: &mut Client,
    out: Output,
    audience: Vec<String>,
    spiffe_id: Option<String>,
) -> Result<(), CliError> {
    let request = req(JwtsvidRequest {
        audience,
        spiffe_id: spiffe_id.unwrap_or_default(),
    });
    let r = c.fetch_jwtsvid(request).await?.into_inner();
    show(out, &JwtView::from(&r))
}

/// JWT-SVIDs as printed.
#[derive(Debug, Serialize)]
struct JwtView<'a> {
    svids: Vec<JwtSvidView<'a>>,
}

/// One JWT-SVID as printed.
#[derive(Debug, Serialize)]
struct JwtSvidView<'a> {
    spiffe_id: &'a str,
    svid: &'a str,
    hint: &'a str,
}

impl<'a> From<&'a JwtsvidResponse> for JwtView<'a> {
    fn from(r: &'a JwtsvidResponse) -> Self {
        let svids = r
            .svids
            .iter()
            .map(|s| JwtSvidView {
                spiffe_id: &s.spiffe_id,
                svid: &s.svid,
                hint: &s.hint,
            })
            .collect();
        Self { svids }
    }
}

impl View for JwtView<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        for s in &self.svids {
            writeln!(w, "token({}):\n\t{}", s.spiffe_id, s.svid)?;
        }
        Ok(())
    }
}

/// What `api validate jwt` prints: the SVID's SPIFFE ID and its claims.
#[derive(Debug, Serialize)]
struct Validated {
    spiffe_id: String,
    claims: Value,
}

impl View for Validated {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(w, "SVID is valid.")?;
        writeln!(w, "SPIFFE ID : {}", self.spiffe_id)?;
        writeln!(w, "Claims    : {}", self.claims)
    }
}

/// A protobuf `Struct` (JWT claims) as JSON; whole numbers print as integers.
fn struct_json(s: prost_types::Struct) -> Value {
    Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| (k, value_json(v)))
            .collect(),
    )
}

fn value_json(v: prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match v.kind {
        Some(Kind::BoolValue(b)) => b.into(),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n).map_or(Value::Null, |x| {
            if n.fract() == 0.0 && n.abs() < 9e15 {
                (n as i64).into()
            } else {
                Value::Number(x)
            }
        }),
        Some(Kind::StringValue(s)) => s.into(),
        Some(Kind::ListValue(l)) => l.values.into_iter().map(value_json).collect(),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::NullValue(_)) | None => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use continuity_proto::workload::Jwtsvid;
    use serde_json::json;

    use super::super::output::rendered;
    use super::*;

    #[test]
    fn jwt_output_is_what_it_always_was() {
        let r = JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: "spiffe://example.org/web".into(),
                svid: "a.b.c".into(),
                hint: "h".into(),
            }],
        };
        let before = json!({"svids": [{"spiffe_id": "spiffe://example.org/web", "svid": "a.b.c", "hint": "h"}]});
        assert_eq!(
            rendered(Output::Json, &JwtView::from(&r)),
            format!("{before}\n")
        );
        assert_eq!(
            rendered(Output::Text, &JwtView::from(&r)),
            "token(spiffe://example.org/web):\n\ta.b.c\n"
        );
    }

    #[test]
    fn validated_output_is_what_it_always_was() {
        use prost_types::value::Kind;
        let num = |n: f64| prost_types::Value {
            kind: Some(Kind::NumberValue(n)),
        };
        let claims = prost_types::Struct {
            fields: [("exp".to_string(), num(1e9)), ("x".to_string(), num(0.5))].into(),
        };
        let v = Validated {
            spiffe_id: "spiffe://example.org/web".into(),
            claims: struct_json(claims),
        };
        let before = json!({"spiffe_id": "spiffe://example.org/web", "claims": {"exp": 1_000_000_000, "x": 0.5}});
        assert_eq!(rendered(Output::Json, &v), format!("{before}\n"));
        assert_eq!(
            rendered(Output::Text, &v),
            "SVID is valid.\nSPIFFE ID : spiffe://example.org/web\nClaims    : {\"exp\":1000000000,\"x\":0.5}\n"
        );
    }
}
