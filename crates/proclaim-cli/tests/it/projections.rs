//! `proclaim status --projections`: the projectors' checkpoints, from the
//! checkpoint table next to the outbox.

use proclaim::postgres::{PgCheckpointOptions, PgCheckpoints};
use proclaim::projector::{CheckpointStore, CheckpointTx};
use proclaim_testkit::pg::TestSchema;

use super::{assert_fails, bound, migrated, run, stderr};

/// Sets `projection`'s checkpoint to `position`, as a projector's batch does.
async fn advance(store: &PgCheckpoints, projection: &str, position: u64) {
    let mut tx = store.begin(projection).await.unwrap();
    tx.set_position(position).await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn status_lists_each_projections_checkpoint() {
    let ts = TestSchema::new().await;
    migrated(&ts).await;

    // No projector has run here: the table is missing, and status says so.
    let out = run(&mut bound(&ts, None), &["status", "--projections"]).await;
    assert_fails(&out, 1, "cannot list the projectors' checkpoints in");
    assert!(
        stderr(&out).contains("--checkpoint-table"),
        "{}",
        stderr(&out)
    );

    let store = PgCheckpoints::with_options(
        ts.pool.clone(),
        PgCheckpointOptions::default().with_schema(&ts.name),
    )
    .unwrap();
    store.migrate().await.unwrap();
    advance(&store, "donor-totals", 1_250).await;
    advance(&store, "dashboard", 7).await;

    let out = run(
        &mut bound(&ts, None),
        &["status", "--projections", "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["checkpoint_table"], store.table_name(), "{status}");
    let mut listed: Vec<(String, u64)> = status["projections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert!(p["updated_at"].as_str().unwrap().ends_with('Z'), "{p}");
            (
                p["projection"].as_str().unwrap().to_owned(),
                p["position"].as_u64().unwrap(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            ("dashboard".to_owned(), 7),
            ("donor-totals".to_owned(), 1_250)
        ]
    );

    let out = run(&mut bound(&ts, None), &["status", "--projections"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(2 projections)"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("projection donor-totals position=1250 updated_at=")),
        "{text}"
    );

    // A checkpoint table of another name; a bad name is refused up front.
    let out = run(
        &mut bound(&ts, None),
        &[
            "status",
            "--projections",
            "--checkpoint-table",
            "other_checkpoints",
        ],
    )
    .await;
    assert_fails(&out, 1, "other_checkpoints");
    let out = run(
        &mut bound(&ts, None),
        &["status", "--projections", "--checkpoint-table", "x; drop"],
    )
    .await;
    assert_fails(&out, 2, "not a valid identifier");
    // Without --projections, --checkpoint-table is a usage error.
    let out = run(
        &mut bound(&ts, None),
        &["status", "--checkpoint-table", "t"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[tokio::test]
async fn status_lists_checkpoints_on_sqlite() {
    let dir = std::env::temp_dir().join(format!(
        "proclaim-cli-projections-{}",
        proclaim_testkit::unique_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("outbox.db").display());
    let cmd = || {
        let mut cmd = super::proclaim();
        cmd.env("PROCLAIM_DATABASE_URL", &url);
        cmd
    };
    let out = run(&mut cmd(), &["migrate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let pool = proclaim::sqlite::SqliteOutbox::connect(&url)
        .await
        .unwrap()
        .pool()
        .clone();
    let store = proclaim::sqlite::SqliteCheckpoints::new(pool);
    store.migrate().await.unwrap();
    let mut tx = store.begin("donor-totals").await.unwrap();
    tx.set_position(42).await.unwrap();
    tx.commit().await.unwrap();

    let out = run(&mut cmd(), &["status", "--projections", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status["projections"][0]["projection"], "donor-totals",
        "{status}"
    );
    assert_eq!(status["projections"][0]["position"], 42, "{status}");
    assert_eq!(status["projections"].as_array().unwrap().len(), 1);
    store.pool().close().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
