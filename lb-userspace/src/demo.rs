//! `xlb demo`: the main job on an embedded default (being written).
use anyhow::Result;

use crate::DemoArgs;

pub fn run(_args: &DemoArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
