//! Edge bridge between field devices and a Stonelion server.
//!
//! NOTE: this binary only prints its purpose. Store-and-forward, HJ 212 input and local
//! Modbus RTU polling come later and will reuse the server's profile and poller library.

fn main() {
    println!(
        "stonelion-bridge: forwards readings from devices whose firmware does not speak \
         Stonelion's MQTT format (not implemented yet)"
    );
}
