//! Generates the demo's gRPC service with protox (no system `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/trellis/demo/v1/inventory.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../../proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
