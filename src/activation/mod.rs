//! Activation: the files that declare activatable names, and starting their services.
pub mod files;
