//! Runs the example end to end, as `scripts/demo` does, in a database and a
//! stream of its own.
#![allow(clippy::unwrap_used, missing_docs)]

use proclaim_testkit::nats::nats_url;
use proclaim_testkit::pg::TestDatabase;

#[tokio::test]
async fn the_campaign_loses_nothing_when_the_bus_is_down() {
    let db = TestDatabase::new().await;
    let stream = format!("T_{}", proclaim_testkit::unique_suffix());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_example-campaign-finance"))
        .args(["--donors", "60", "--stream", &stream])
        .env("DATABASE_URL", db.url())
        .env("NATS_URL", nats_url())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("donors committed: 61"), "{stdout}");
    assert!(stdout.contains("volunteer-thank-you: delivered 61, duplicates 0, lost 0, rolled-back donor heard: false"), "{stdout}");
    assert!(stdout.contains("fundraising-strategy: delivered 61, duplicates 0, lost 0, rolled-back donor heard: false"), "{stdout}");
    assert!(
        stdout.contains("Nothing lost, nothing invented."),
        "{stdout}"
    );
}
