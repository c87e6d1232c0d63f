//! Fuzzes the parsers of the environment (transport, engine and kvstore
//! configuration): any `NAME=value` lines give a configuration or an error
//! naming the variable, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/config_env.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    common::check(data);
});
