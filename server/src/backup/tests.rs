//! The backup file format: round trips, and every kind of damage refused with its reason.

use super::*;
use crate::datastore::{EngineStore, Scratch, on_both_backends};
use crate::model::engine::Incarnation;

fn sample() -> Backup {
    Backup {
        header: Header {
            format: FORMAT.into(),
            version: VERSION,
            created_at: 1_700_000_000,
            trust_domain: "example.org".into(),
            key_manager: "disk".into(),
            schema_version: 4,
            kdf: None,
        },
        tables: vec![TableDump {
            name: "things".into(),
            columns: vec![
                ("id".into(), "TEXT".into()),
                ("n".into(), "BIGINT".into()),
                ("b".into(), "BLOB".into()),
                ("opt".into(), "TEXT".into()),
            ],
            rows: vec![
                vec![
                    Value::from("a"),
                    Value::from(1),
                    serde_json::json!({"b64": "AAEC"}),
                    Value::Null,
                ],
                vec![
                    Value::from("b"),
                    Value::from(-7),
                    serde_json::json!({"b64": ""}),
                    Value::from("x"),
                ],
            ],
        }],
        sealed_keys: None,
        hsm_labels: vec!["ca-x509-1".into()],
    }
}

fn err(r: Result<(Backup, Option<PassphraseKeys>), BackupError>) -> String {
    match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.0,
    }
}

#[test]
fn round_trip_without_and_with_a_passphrase() {
    let b = sample();
    let file = encode(&b, None);
    assert_eq!(decode(&file, None).unwrap().0, b);

    let mut b = sample();
    b.header.kdf = Some(new_kdf().unwrap());
    let keys = PassphraseKeys::derive(b"pw", b.header.kdf.as_ref().unwrap()).unwrap();
    let files = vec![("ca.key".to_string(), b"secret-key-bytes".to_vec())];
    b.sealed_keys = Some(keys.seal_files(&files).unwrap());
    let file = encode(&b, Some(&keys));
    assert!(!String::from_utf8_lossy(&file).contains("secret-key-bytes"));
    let (back, k) = decode(&file, Some(b"pw")).unwrap();
    assert_eq!(back, b);
    let opened = k
        .unwrap()
        .open_files(back.sealed_keys.as_ref().unwrap())
        .unwrap();
    assert_eq!(opened[0].0, "ca.key");
    assert_eq!(&opened[0].1[..], b"secret-key-bytes");

    assert!(err(decode(&file, Some(b"other"))).contains("passphrase is wrong"));
    assert!(err(decode(&file, None)).contains("--passphrase-file"));
}

#[test]
fn truncation_edits_and_resealed_edits_are_refused() {
    let mut b = sample();
    b.header.kdf = Some(new_kdf().unwrap());
    let keys = PassphraseKeys::derive(b"pw", b.header.kdf.as_ref().unwrap()).unwrap();
    let file = encode(&b, Some(&keys));
    for cut in [0, 1, file.len() / 2, file.len() - 1] {
        assert!(
            err(decode(&file[..cut], Some(b"pw"))).contains("truncated"),
            "cut at {cut}"
        );
    }
    for at in [3, file.len() / 2, file.len() - 40] {
        let mut f = file.clone();
        f[at] ^= 0x01;
        let e = err(decode(&f, Some(b"pw")));
        assert!(
            e.contains("modified") || e.contains("truncated"),
            "{at}: {e}"
        );
    }
    // An edit with the SHA-256 recomputed is still caught by the passphrase HMAC.
    let mut edited = b.clone();
    edited.tables[0].rows[0][1] = Value::from(2);
    let resealed = encode(&edited, None);
    let text = String::from_utf8(resealed).unwrap();
    let (body, _) = text.trim_end().rsplit_once('\n').unwrap();
    let trailer = format!(
        "{{\"trailer\":{{\"lines\":4,\"sha256\":\"{}\",\"hmac\":\"{}\"}}}}\n",
        sha256_hex(format!("{body}\n").as_bytes()),
        "00".repeat(32)
    );
    let forged = format!("{body}\n{trailer}");
    assert!(err(decode(forged.as_bytes(), Some(b"pw"))).contains("passphrase is wrong"));
}

on_both_backends! {
    async fn a_datastore_dump_loads_into_another_unchanged(s) {
        let other = Scratch::new(s.backend, "backup-two").await;
        let (one, two) = (&s.store, &other.store);
        one.upsert_incarnation(&Incarnation {
            engine: "orders".into(),
            entry_id: "e1".into(),
            agent_id: "spiffe://example.org/agent".into(),
            workload_id: "w1".into(),
            pid: 7,
            uid: 1000,
            selectors: vec![],
            first_seen: 1,
            last_seen: 2,
        })
        .await
        .unwrap();
        let dump = one.dump().await.unwrap();
        assert!(
            dump.iter()
                .any(|t| t.name == "incarnations" && t.rows.len() == 1)
        );
        assert!(dump.iter().all(|t| t.name != "schema_migrations"));
        assert!(two.non_empty_tables().await.unwrap().is_empty());
        two.load(&dump).await.unwrap();
        assert_eq!(two.dump().await.unwrap(), dump);
        assert_eq!(
            two.non_empty_tables().await.unwrap(),
            vec!["incarnations".to_string()]
        );
        let mut bad = dump.clone();
        bad[0].columns.push(("nope".into(), "TEXT".into()));
        for r in &mut bad[0].rows {
            r.push(Value::Null);
        }
        let e = two.load(&bad).await.unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
