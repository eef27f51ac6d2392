from lns_surgery.cli import main

if __name__ == "__main__":
    main()
