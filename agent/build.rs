// Link settings of the `roost-agent` binary, and of `roost` (roost/build.rs includes this
// file).
//
// Relative relocations packed (`-z pack-relative-relocs`, DT_RELR): a position-independent
// Rust binary carries one 24-byte relocation for every pointer in its vtables and constant
// tables (`.rela.dyn`: 0.5 MiB of the agent, more of `roost`), which the loader reads at
// every start; packed, they take a few KiB. The binary stays position-independent (ASLR). It
// then needs glibc 2.36 or later where it runs (the image's Debian bookworm has it; a build
// on bookworm needs 2.34 anyway) and GNU ld 2.38, lld (rustc's default linker here) or mold
// where it is linked; older GNU ld ignores the option. `ROOST_NO_RELR=1` builds without it,
// for an older glibc.

fn main() {
    println!("cargo:rerun-if-env-changed=ROOST_NO_RELR");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && std::env::var_os("ROOST_NO_RELR").is_none()
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
