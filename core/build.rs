fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/order.proto");
    tonic_prost_build::configure().compile_protos(&["proto/order.proto"], &["proto"])?;
    Ok(())
}
