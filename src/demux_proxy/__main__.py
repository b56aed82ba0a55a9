from demux_proxy.cli import main

main()
