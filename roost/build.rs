//! Link settings of the `roost` binary: the agent's (packed relative relocations), see there.

include!("../agent/build.rs");
