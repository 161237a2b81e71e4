"""One module per command of ``fastpix2pix``: its options and its ``run(args)`` (or ``main(argv)``)."""
