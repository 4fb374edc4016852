//! Runs the example end to end, as `scripts/demo` does, in a database and a
//! stream of its own.
#![allow(clippy::unwrap_used, missing_docs)]

use proclaim_testkit::nats::nats_url;
use proclaim_testkit::pg::TestDatabase;

#[tokio::test]
async fn the_campaign_loses_nothing_and_thanks_each_donor_once() {
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
    // 60 donors in the outage, donor 1 before it, donor 63 after it; donor 62
    // rolled back.
    assert!(stdout.contains("donors committed: 62"), "{stdout}");
    // Every event twice (124 deliveries); the thank-you service also got the
    // note it crashed on again.
    assert!(stdout.contains("volunteer-thank-you: 124 deliveries, 63 redeliveries skipped by the inbox, 62 notes for 62 donors, rolled-back donor thanked: false"), "{stdout}");
    assert!(
        stdout
            .contains("fundraising-strategy: 124 deliveries, 62 redeliveries skipped by the inbox"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "One thank-you per donor; nothing lost, nothing invented, nothing counted twice."
        ),
        "{stdout}"
    );
}
