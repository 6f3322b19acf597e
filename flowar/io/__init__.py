"""Files the other layers write: PNG grids and PSNR, atomic writes and write probes."""
