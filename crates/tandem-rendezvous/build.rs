//! Compiles the rendezvous protocol with protox, so no `protoc` is needed on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/tandem/rendezvous/v1/rendezvous.proto";
    let fds = protox::compile([proto], ["../../proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    println!("cargo:rerun-if-changed={proto}");
    Ok(())
}
