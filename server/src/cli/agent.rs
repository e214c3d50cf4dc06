//! `agent`: attested agents.

use std::io::{self, Write};

use clap::Subcommand;
use continuity_proto::admin::agent_admin_client::AgentAdminClient;
use continuity_proto::admin::{
    BanAgentRequest, EvictAgentRequest, GetAgentRequest, ListAgentsRequest,
};
use continuity_proto::types;
use serde::Serialize;
use tonic::transport::Channel;

use super::error::CliError;
use super::output::{Output, View, plural, say, show};

/// `agent` subcommands.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List attested agents.
    List,
    /// Count attested agents.
    Count,
    /// Show one agent.
    Show {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
    /// Remove an agent; it must attest again to return.
    Evict {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
    /// Ban an agent: refuse its calls and its re-attestation.
    Ban {
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
    },
}

/// Runs an `agent` command.
pub async fn run(ch: Channel, out: Output, cmd: AgentCommand) -> Result<(), CliError> {
    let mut c = AgentAdminClient::new(ch);
    match cmd {
        AgentCommand::List => {
            let r = c.list_agents(ListAgentsRequest {}).await?.into_inner();
            let agents = r.agents.iter().map(AgentView::from).collect();
            show(out, &AgentList { agents })
        }
        AgentCommand::Count => {
            let r = c.list_agents(ListAgentsRequest {}).await?.into_inner();
            show(
                out,
                &super::output::Count::new(r.agents.len(), "attested agent", ("", "s")),
            )
        }
        AgentCommand::Show { spiffe_id } => {
            let a = c.get_agent(GetAgentRequest { spiffe_id }).await?;
            show(out, &AgentView::from(&a.into_inner()))
        }
        AgentCommand::Evict { spiffe_id } => {
            let request = EvictAgentRequest {
                spiffe_id: spiffe_id.clone(),
            };
            c.evict_agent(request).await?;
            say(format_args!("Agent {spiffe_id} evicted."))
        }
        AgentCommand::Ban { spiffe_id } => {
            let request = BanAgentRequest {
                spiffe_id: spiffe_id.clone(),
            };
            c.ban_agent(request).await?;
            say(format_args!("Agent {spiffe_id} banned."))
        }
    }
}

/// An agent as printed.
#[derive(Debug, Serialize)]
pub struct AgentView<'a> {
    spiffe_id: &'a str,
    attestation_type: &'a str,
    serial_number: &'a str,
    expires_at: i64,
    banned: bool,
    alias: &'a str,
    created_at: i64,
    last_seen: i64,
    forked: bool,
    forked_at: i64,
    /// Node selectors from the last attestation, `TYPE:VALUE` (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    selectors: Vec<String>,
}

impl<'a> From<&'a types::Agent> for AgentView<'a> {
    fn from(a: &'a types::Agent) -> Self {
        Self {
            spiffe_id: &a.spiffe_id,
            attestation_type: &a.attestation_type,
            serial_number: &a.serial_number,
            expires_at: a.expires_at,
            banned: a.banned,
            alias: &a.alias,
            created_at: a.created_at,
            last_seen: a.last_seen,
            forked: a.forked,
            forked_at: a.forked_at,
            selectors: a
                .selectors
                .iter()
                .map(|s| format!("{}:{}", s.r#type, s.value))
                .collect(),
        }
    }
}

impl View for AgentView<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(w, "SPIFFE ID        : {}", self.spiffe_id)?;
        writeln!(w, "Attestation type : {}", self.attestation_type)?;
        writeln!(w, "SVID serial      : {}", self.serial_number)?;
        writeln!(w, "SVID expires at  : {}", self.expires_at)?;
        writeln!(w, "Banned           : {}", self.banned)?;
        if !self.alias.is_empty() {
            writeln!(w, "Alias            : {}", self.alias)?;
        }
        for s in &self.selectors {
            writeln!(w, "Selector         : {s}")?;
        }
        if self.forked {
            writeln!(
                w,
                "Forked           : true (at {}; a superseded SVID was presented: ban or evict, then re-attest)",
                self.forked_at
            )?;
        }
        writeln!(w)
    }
}

/// What `agent list` prints.
#[derive(Debug, Serialize)]
struct AgentList<'a> {
    agents: Vec<AgentView<'a>>,
}

impl View for AgentList<'_> {
    fn text(&self, w: &mut dyn Write) -> io::Result<()> {
        let n = self.agents.len();
        writeln!(w, "Found {n} attested agent{}", plural(n, "", "s"))?;
        self.agents.iter().try_for_each(|a| a.text(w))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::output::rendered;
    use super::*;

    fn agent(forked: bool) -> types::Agent {
        types::Agent {
            spiffe_id: "spiffe://example.org/continuity/agent/join_token/x".into(),
            attestation_type: "join_token".into(),
            serial_number: "0a".into(),
            expires_at: 5,
            banned: false,
            alias: if forked {
                "spiffe://example.org/node".into()
            } else {
                String::new()
            },
            created_at: 1,
            last_seen: 2,
            selectors: vec![],
            forked,
            forked_at: if forked { 4 } else { 0 },
        }
    }

    #[test]
    fn agent_json_is_what_it_always_was() {
        let a = agent(true);
        let before = json!({
            "spiffe_id": a.spiffe_id, "attestation_type": "join_token", "serial_number": "0a",
            "expires_at": 5, "banned": false, "alias": a.alias, "created_at": 1,
            "last_seen": 2, "forked": true, "forked_at": 4,
        });
        assert_eq!(
            rendered(Output::Json, &AgentView::from(&a)),
            format!("{before}\n")
        );
        let list = AgentList {
            agents: vec![AgentView::from(&a)],
        };
        let expected = format!("{}\n", json!({ "agents": [before] }));
        assert_eq!(rendered(Output::Json, &list), expected);
    }

    #[test]
    fn agent_text_is_what_it_always_was() {
        let plain = agent(false);
        let base = "SPIFFE ID        : spiffe://example.org/continuity/agent/join_token/x\n\
                    Attestation type : join_token\nSVID serial      : 0a\n\
                    SVID expires at  : 5\nBanned           : false\n";
        assert_eq!(
            rendered(Output::Text, &AgentView::from(&plain)),
            format!("{base}\n")
        );
        let forked = agent(true);
        let list = AgentList {
            agents: vec![AgentView::from(&forked)],
        };
        assert_eq!(
            rendered(Output::Text, &list),
            format!(
                "Found 1 attested agent\n{base}Alias            : spiffe://example.org/node\n\
                 Forked           : true (at 4; a superseded SVID was presented: ban or evict, then re-attest)\n\n"
            )
        );
    }
}
