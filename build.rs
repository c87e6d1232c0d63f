//! Gives the C library a soname on Linux, as an installed shared library
//! has (`scripts/install-c.sh` installs it with its links):
//! `libpskv.so.MAJOR`, or `libpskv.so.0.MINOR` before 1.0, when a minor
//! release may change the ABI.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" {
        let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
        let minor = std::env::var("CARGO_PKG_VERSION_MINOR").unwrap_or_else(|_| "0".into());
        let abi = if major == "0" {
            format!("0.{minor}")
        } else {
            major
        };
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libpskv.so.{abi}");
    }
}
