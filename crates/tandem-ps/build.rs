//! Compiles the parameter-server protocol with protox, so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/tandem/ps/v1/ps.proto";
    let fds = protox::compile([proto], ["../../proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    println!("cargo:rerun-if-changed={proto}");
    Ok(())
}
