//! Decodes arbitrary bytes as a CloudEvents JSON envelope.
//!
//! Decoding must never panic; what decodes must keep its payload byte for
//! byte, and encode to JSON that decodes to the same event again.

#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use proclaim_core::{Event, EventError};
use serde_json::value::RawValue;

fuzz_target!(|bytes: &[u8]| {
    let Ok(json) = std::str::from_utf8(bytes) else {
        return;
    };
    let event = match Event::from_cloudevent_json(json) {
        Ok(event) => event,
        Err(e) => {
            // Errors must say what is wrong.
            assert!(!e.to_string().is_empty());
            if let EventError::Invalid { reason, .. } = &e {
                assert!(!reason.is_empty(), "{e:?}");
            }
            return;
        }
    };

    // The payload is the exact text of the input's `data` (`null` if absent).
    if let Ok(input) = serde_json::from_str::<BTreeMap<String, &RawValue>>(json) {
        let data = input.get("data").map_or("null", |raw| raw.get());
        assert_eq!(event.data().get(), data, "{json}");
    }

    let encoded = event.to_cloudevent_json();
    // The encoding is a JSON object with every required attribute.
    let object: BTreeMap<String, &RawValue> = serde_json::from_str(&encoded)
        .unwrap_or_else(|e| panic!("the encoding is not a JSON object ({e}): {encoded}"));
    for attribute in [
        "specversion",
        "id",
        "type",
        "source",
        "subject",
        "time",
        "data",
    ] {
        assert!(
            object.contains_key(attribute),
            "no {attribute} in {encoded}"
        );
    }
    assert_eq!(object["data"].get(), event.data().get(), "{encoded}");

    let again = Event::from_cloudevent_json(&encoded)
        .unwrap_or_else(|e| panic!("the re-encoded event does not decode ({e}): {encoded}"));
    assert_eq!(again, event, "{encoded}");
    assert_eq!(again.data().get(), event.data().get());
    assert_eq!(again.to_cloudevent_json(), encoded);
});
