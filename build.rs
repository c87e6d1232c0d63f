//! Gives the C library a soname (`libpskv.so.MAJOR`) on Linux, as an
//! installed shared library has (`scripts/install-c.sh` installs it with
//! its links).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" {
        let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libpskv.so.{major}");
    }
}
