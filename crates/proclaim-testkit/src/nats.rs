//! JetStream test streams (being written).
