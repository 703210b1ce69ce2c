from topic_audit.cli import main

main()
