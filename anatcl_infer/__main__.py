from anatcl_infer.cli import main

main()
