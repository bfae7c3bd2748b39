//! `aoai-sim [--listen ADDR]`: the simulator with its default deployments, for running it
//! without the rest of Tollgate (`tollgate sim` does the same with a configuration file).

use std::net::SocketAddr;

use axum::serve::ListenerExt;

use tollgate_aoai_sim::{SimConfig, Simulator};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:8081".parse()?;
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr.parse()?,
            _ => return Err(format!("usage: aoai-sim [--listen ADDR] (got `{arg}`)").into()),
        }
    }
    let sim = Simulator::new(SimConfig::default())?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    #[expect(clippy::print_stdout, reason = "the binary reports where it listens")]
    {
        println!("simulator listening on http://{}", listener.local_addr()?);
    }
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, sim.router())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
