//! Memory management: the physical layout plan, the page-frame pool and translation tables.

pub mod frames;
pub mod layout;
pub mod pgtable;
pub mod stage2;
