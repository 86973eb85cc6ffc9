//! `vae`: a variational-autoencoder trainer and sampler after Kingma & Welling, "Auto-Encoding
//! Variational Bayes" (2013), on candle. One module per concern; `main.rs` only parses the CLI.

pub mod codes;
pub mod config;
pub mod convnet;
pub mod data;
pub mod device;
pub mod engine;
pub mod eval;
pub mod explore;
pub mod interrupt;
pub mod loss;
pub mod made;
pub mod model;
pub mod optim;
pub mod picture;
pub mod pictures;
pub mod plot;
pub mod run;
pub mod schedule;
pub mod step;
pub mod train;
