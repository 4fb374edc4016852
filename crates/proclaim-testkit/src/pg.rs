//! PostgreSQL test schemas.
