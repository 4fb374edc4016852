//! One file per `proclaim` subcommand.

pub(crate) mod chaos;
pub(crate) mod demo;
pub(crate) mod emit;
pub(crate) mod migrate;
pub(crate) mod relay;
pub(crate) mod replay;
pub(crate) mod status;
